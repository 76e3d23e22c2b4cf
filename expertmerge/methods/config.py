"""The typed schema of a `merge` YAML (mergekit's format), checked before any model is opened.

```yaml
merge_method: ties                 # average | task_arithmetic | ties | dare_linear | dare_ties
base_model: path/or/org-name       # needed by every method but `average`
models:
  - model: path/to/expert_a
    parameters: {weight: 1.0, density: 0.5}
parameters: {normalize: true, lambda: 1.0, rescale: true, int8_mask: false, weight: 1.0, density: 1.0}
dtype: bfloat16                    # output dtype; default: the base's stored dtype
tokenizer_source: base             # only `base` (the merged model keeps the base's tokenizer)
random_seed: 0                     # DARE's drop masks (`seed` is accepted too)
```

Two layers: `MergeYAML` (pydantic) types the file's structure (keys, strings, lists, booleans, the seed);
the chosen method's declared `Parameter`s then check every `parameters:` value (finite, in range, the right
type, used by that method). Every error names the file, the key path (`models[1].parameters.density`), what
was given and what is allowed; unknown keys get a "did you mean", mergekit keys we lack say what to do.
Our additions: `include` / `exclude` (regular expressions choosing the merged tensors), `trust_remote_code`
and `output_dir`.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from expertmerge.errors import ExpertMergeError
from expertmerge.io.reader import DTYPE_ALIASES, DTYPES
from expertmerge.methods import METHODS, MergeMethod, get_method, known_parameters, tensor_generator
from expertmerge.paths import ZOO_SCHEME
from expertmerge.pool import looks_like_hub_id

# The output dtypes a config may name (the arithmetic is always fp32): the one dtype table's names and aliases.
DTYPE_NAMES = tuple(DTYPES)

# mergekit keys with no equivalent here, and what to do instead.
UNSUPPORTED = {
    "slices": "slice-wise merges (frankenmerges, layer ranges) are not supported; use `models:` to merge whole "
    "models, and `include`/`exclude` to choose tensors",
    "chat_template": "chat templates are not rewritten; the base's tokenizer files (and template) are copied",
    "modules": "module-wise (multimodal) configs are not supported; merge the text model with `models:`",
    "architecture": "architecture-agnostic merges are not supported; experts must share the base's architecture",
}
_UNSUPPORTED_UNDER = {"tokenizer": "not supported; only `tokenizer: {source: base}` is."}
_MISSING = {
    "merge_method": "missing; say which method to use, e.g. `merge_method: ties`.",
    "models": "missing; give a non-empty list of `- model: <path>` entries.",
    "model": "missing; give the expert's folder, zoo:// reference or hub id.",
}
_EXPECTED = {
    "string_type": "a non-empty string",
    "int_type": "an integer",
    "bool_type": "true or false",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "list_type": "a list",
}


# ------------------------------------------------------------------------------------------ the schema


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
    # strict: `true` is not a seed, "yes" is not a boolean, 3 is not a path; unknown keys are errors.
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


class TokenizerYAML(_Schema):
    source: str = "base"

    @field_validator("source")
    @classmethod
    def _base_only(cls, value: str) -> str:
        if value != "base":
            raise ValueError(f"'{value}' is not supported; only `tokenizer: {{source: base}}` is.")
        return value


class MergeYAML(_Schema):
    """The keys of a merge YAML and their types; method parameters are checked against the method after."""

    merge_method: str
    base_model: str | None = None
    models: list[ModelYAML]
    parameters: dict[str, Any] | None = None
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    tokenizer: TokenizerYAML | None = None
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

    @field_validator("models", mode="before")
    @classmethod
    def _non_empty(cls, value: Any) -> Any:
        if not isinstance(value, list) or not value:
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
        if value is not None and value != "base":
            raise ValueError(
                f"'{value}' is not supported; only `base` is (experts must share the base's vocabulary, and the "
                "merged model keeps the base's tokenizer). Remove the key or set it to `base`."
            )
        return value


# ------------------------------------------------------------------------------------- the resolved config


@dataclass(frozen=True)
class ModelEntry:
    """One expert: a source (folder, `zoo://`, hub id) and the method's per-model parameters, defaults filled."""

    source: str
    parameters: dict[str, Any] = field(default_factory=dict)

    @property
    def weight(self) -> float:
        return self.parameters.get("weight", 1.0)

    @property
    def density(self) -> float:
        return self.parameters.get("density", 1.0)


@dataclass
class MergeConfig:
    """A validated merge config. `path` is where it was read from (for messages); `raw` is the YAML as given.

    `parameters` holds every global parameter the method declares, its defaults (mergekit's) filled in.
    """

    merge_method: str
    models: list[ModelEntry]
    parameters: dict[str, Any] = field(default_factory=dict)
    base_model: str | None = None
    dtype: str | None = None  # None: the base's stored dtype
    tokenizer_source: str = "base"
    seed: int = 0
    include: list[str] | None = None
    exclude: list[str] | None = None
    trust_remote_code: bool = False
    output_dir: str | None = None
    path: str = "<config>"
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def method(self) -> MergeMethod:
        return get_method(self.merge_method)

    def to_mergekit_yaml(self) -> str:
        """The resolved config (defaults written out) in the same format, so the merge can be re-run."""
        data: dict[str, Any] = {"merge_method": self.merge_method}
        if self.base_model is not None:
            data["base_model"] = self.base_model
        data["models"] = [{"model": m.source, "parameters": dict(m.parameters)} for m in self.models]
        data["parameters"] = dict(self.parameters)
        if self.dtype is not None:
            data["dtype"] = self.dtype
        data["tokenizer_source"] = self.tokenizer_source
        data["random_seed"] = self.seed
        if self.include is not None:
            data["include"] = list(self.include)
        if self.exclude is not None:
            data["exclude"] = list(self.exclude)
        if self.trust_remote_code:
            data["trust_remote_code"] = True
        return yaml.safe_dump(data, sort_keys=False)


# ------------------------------------------------------------------------------------------ the checks


def _fail(path: str, key: str, message: str) -> ExpertMergeError:
    return ExpertMergeError(f"{path}: key '{key}': {message}")


def _key(loc: Sequence[Any]) -> str:
    key = ""
    for part in loc:
        key += f"[{part}]" if isinstance(part, int) else (f".{part}" if key else str(part))
    return key


def _schema_error(error: ValidationError, path: str) -> ExpertMergeError:
    """pydantic's first problem in our words; unknown keys first, since they explain the 'missing' ones."""
    problems = sorted(error.errors(), key=lambda e: e["type"] != "extra_forbidden")
    problem = problems[0]
    loc = [part for part in problem["loc"] if part != "[key]"]
    key, name, kind = _key(loc), loc[-1] if loc else "", problem["type"]
    if kind == "extra_forbidden":
        parent = _key(loc[:-1])
        if name in UNSUPPORTED:
            message = f"not supported: {UNSUPPORTED[name]}."
        elif parent in _UNSUPPORTED_UNDER:
            message = _UNSUPPORTED_UNDER[parent]
        else:
            schema = {"": MergeYAML, "tokenizer": TokenizerYAML}.get(parent, ModelYAML)
            known = list(schema.model_fields)
            close = difflib.get_close_matches(str(name), known, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            message = f"unknown key.{hint} Known keys here: {', '.join(known)}."
    elif kind == "missing":
        message = _MISSING.get(str(name), "missing.")
    elif kind == "value_error":
        message = str(problem["ctx"]["error"])
    elif kind in _EXPECTED:
        message = f"expected {_EXPECTED[kind]}, got {problem['input']!r}."
    else:
        message = f"{problem['msg']} (got {problem['input']!r})."
    more = len(problems) - 1
    suffix = f" ({more} more problem{'s' if more > 1 else ''} in this file.)" if more else ""
    return _fail(path, key, message + suffix)


def _users(name: str) -> str:
    return ", ".join(m.name for m in METHODS.values() if m.parameter(name) is not None)


def _parameter_values(
    method: MergeMethod, given: Mapping[str, Any], where: str, path: str, per_model: bool
) -> dict[str, Any]:
    """The values set under one `parameters:` mapping, each checked against the method's declaration."""
    known = known_parameters()
    values: dict[str, Any] = {}
    for name, value in given.items():
        key = f"{where}.{name}"
        declared = method.parameter(name)
        spec = declared or known.get(name)
        if spec is None:
            here = [p.name for p in method.parameters if p.scope == "model" or not per_model]
            close = difflib.get_close_matches(str(name), [*here, *known], n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise _fail(path, key, f"unknown parameter.{hint} '{method.name}' reads: {', '.join(here)}.")
        if value is None:
            continue  # explicitly unset: the default applies, as when the key is absent
        try:
            checked = spec.check(value)
        except ValueError as error:
            raise _fail(path, key, str(error)) from error
        if declared is None:
            if checked == spec.neutral:
                continue  # the value that changes nothing is harmless
            raise _fail(
                path,
                key,
                f"{name} {value!r} has no effect with '{method.name}'; remove it, or use a method that "
                f"reads it ({_users(name)}).",
            )
        if per_model and spec.scope == "global":
            raise _fail(path, key, f"'{name}' is set once per merge, under the top-level `parameters:`.")
        values[name] = checked
    return values


def _resolve(schema: MergeYAML, data: Mapping[str, Any], path: str) -> MergeConfig:
    method = get_method(schema.merge_method)
    given = _parameter_values(method, schema.parameters or {}, "parameters", path, per_model=False)
    global_values = {
        **method.defaults("global"),
        **{k: v for k, v in given.items() if k not in _model_keys(method)},
    }
    model_defaults = {
        **method.defaults("model"),
        **{k: v for k, v in given.items() if k in _model_keys(method)},
    }
    models = [
        ModelEntry(
            entry.model,
            {
                **model_defaults,
                **_parameter_values(
                    method, entry.parameters or {}, f"models[{i}].parameters", path, per_model=True
                ),
            },
        )
        for i, entry in enumerate(schema.models)
    ]
    sources = [m.source for m in models]
    for i, source in enumerate(sources):
        if sources.index(source) != i:
            raise _fail(
                path,
                f"models[{i}].model",
                f"'{source}' is listed twice (first as models[{sources.index(source)}]).",
            )
    if schema.base_model is None and method.needs_base:
        raise _fail(
            path,
            "base_model",
            f"missing; '{schema.merge_method}' works on task vectors (model - base), so it needs a base model.",
        )
    seeds = {k: v for k, v in (("random_seed", schema.random_seed), ("seed", schema.seed)) if v is not None}
    if len(set(seeds.values())) > 1:
        raise _fail(
            path, "seed", f"random_seed={seeds['random_seed']} and seed={seeds['seed']} disagree; give one."
        )
    seed = next(iter(seeds.values()), 0)
    # Anything else the method refuses (e.g. `average` normalizing weights that sum to 0) shows up on a
    # one-element dry run, before any model is opened.
    try:
        # Distinct non-zero values: no method's degenerate case (zero or antipodal vectors) is hit.
        dry = [m for m in models if not (method.uses_base and m.source == schema.base_model)]
        method.merge(
            torch.zeros(1) if method.uses_base and schema.base_model is not None else None,
            [torch.full((1,), float(i + 1)) for i in range(len(dry))],
            [m.parameters for m in dry],
            global_values,
            tensor_generator(seed, "dry-run"),
        )
    except ExpertMergeError as error:
        raise ExpertMergeError(f"{path}: {error}") from error
    return MergeConfig(
        merge_method=method.name,
        models=models,
        parameters=global_values,
        base_model=schema.base_model,
        dtype=schema.out_dtype or schema.dtype,  # mergekit: out_dtype (the output's) overrides dtype
        seed=seed,
        include=schema.include,
        exclude=schema.exclude,
        trust_remote_code=schema.trust_remote_code,
        output_dir=schema.output_dir,
        path=path,
        raw=dict(data),
    )


def _model_keys(method: MergeMethod) -> set[str]:
    return {p.name for p in method.parameters if p.scope == "model"}


def parse_merge_config(data: Any, path: str = "<config>") -> MergeConfig:
    """Validate a config given as a mapping (already read from YAML); every error names `path` and the key."""
    if not isinstance(data, Mapping):
        raise ExpertMergeError(
            f"{path}: expected a mapping of keys at the top level, got {type(data).__name__}."
        )
    try:
        schema = MergeYAML.model_validate(dict(data))
    except ValidationError as error:
        raise _schema_error(error, path) from None
    return _resolve(schema, data, path)


def load_merge_config(path: str | os.PathLike) -> MergeConfig:
    """Read and validate a merge YAML; relative model paths are taken as given (relative to the cwd)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise ExpertMergeError(f"Cannot read merge config '{path}': {error}") from error
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ExpertMergeError(f"{path}: not valid YAML: {error}") from error
    return parse_merge_config(data, str(path))
