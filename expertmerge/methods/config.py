"""The typed schema of a `merge` YAML (mergekit's format), checked before any model is opened.

```yaml
merge_method: ties                 # see `expertmerge.methods.METHODS`; `linear` = average
base_model: path/or/org-name       # needed by every method but `average` and `passthrough`
models:                            # or `slices:` (below), not both
  - model: path/to/expert_a
    parameters: {weight: [0.2, 1.0], density: [{filter: mlp, value: 0.5}, {value: 1.0}]}
parameters: {normalize: true, lambda: 1.0, rescale: true, int8_mask: false, weight: 1.0, density: 1.0}
slices:                            # layer ranges: same-range merges, or passthrough stacks that change depth
  - sources:
      - {model: path/a, layer_range: [0, 2], parameters: {scale: 0.5}}
    parameters: {...}              # the slice's defaults (between a source's and the top level's)
dtype: bfloat16                    # the precision inputs are read in (mergekit's meaning)
out_dtype: float32                 # the output's dtype (default: dtype, else the base's stored dtype)
tokenizer_source: base             # base | union | <model>; or tokenizer: {source, tokens, pad_to_multiple_of}
chat_template: auto                # auto (the most common among the models) | alpaca, chatml, exaone, llama3, mistral | a Jinja template
random_seed: 0                     # random drop masks (`seed` is accepted too)
```

Two layers: `MergeYAML` (pydantic) types the file's structure; the chosen method's declared `Parameter`s then
check every `parameters:` value (each scalar of a gradient or filter list; see `expertmerge.methods.settings`).
Errors name the file, the key path (`models[1].parameters.density`), what was given and what is allowed.
A key mergekit accepts and ignores (an unknown key, a parameter the method does not read) is a warning in
`MergeConfig.warnings`, so a config mergekit runs runs here. Our additions: `include` / `exclude` (regular
expressions choosing the merged tensors), `trust_remote_code` and `output_dir`.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import yaml
from pydantic import ValidationError

from expertmerge.errors import ExpertMergeError
from expertmerge.io.tokenizer import check_chat_template
from expertmerge.methods import METHODS, MergeMethod, get_method, known_parameters, tensor_generator
from expertmerge.methods.schema import (
    _EXPECTED,
    _MISSING,
    _SCHEMAS,
    UNSUPPORTED,
    MergeYAML,
    TokenizerYAML,
    _Schema,
)
from expertmerge.methods.settings import Setting, is_constant, parse_setting, resolve, scalars, to_yaml

# ------------------------------------------------------------------------------------- the resolved config


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


# ------------------------------------------------------------------------------------------ the checks


def _fail(path: str, key: str, message: str) -> ExpertMergeError:
    return ExpertMergeError(f"{path}: key '{key}': {message}")


def _key(loc: Sequence[Any]) -> str:
    key = ""
    for part in loc:
        key += f"[{part}]" if isinstance(part, int) else (f".{part}" if key else str(part))
    return key


def _strip_unknown(data: Mapping[str, Any], warnings: list[str]) -> dict[str, Any]:
    """The config without the keys mergekit ignores (each one a warning with a "did you mean")."""

    def clean(value: Any, schema: type[_Schema], where: str) -> Any:
        if not isinstance(value, Mapping):
            return value
        known = list(schema.model_fields)
        kept = {}
        for key, item in value.items():
            if key in known or (schema is MergeYAML and key in UNSUPPORTED):
                kept[key] = item
                continue
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            name = f"{where}.{key}" if where else str(key)
            warnings.append(f"key '{name}': unknown key, ignored (as mergekit does).{hint}")
        for key, child in (("models", "models"), ("slices", "slices"), ("sources", "sources")):
            if isinstance(kept.get(key), list):
                kept[key] = [
                    clean(entry, _SCHEMAS[child], f"{where + '.' if where else ''}{key}[{i}]")
                    for i, entry in enumerate(kept[key])
                ]
        if schema is MergeYAML and isinstance(kept.get("tokenizer"), Mapping):
            kept["tokenizer"] = clean(kept["tokenizer"], TokenizerYAML, "tokenizer")
        return kept

    return clean(data, MergeYAML, "")


def _schema_error(error: ValidationError, path: str) -> ExpertMergeError:
    """pydantic's first problem in our words."""
    # unsupported keys first (they explain the 'missing' ones), then our own checks' words over type names
    problems = sorted(
        error.errors(), key=lambda e: (e["type"] != "extra_forbidden", e["type"] != "value_error")
    )
    problem = problems[0]
    # pydantic names the union member it tried (`str`, `TokenSourceYAML`) in the location: not a key.
    loc = [
        p for p in problem["loc"] if p != "[key]" and p != "str" and not str(p).endswith(("YAML", "YAML]"))
    ]
    key, name, kind = _key(loc), loc[-1] if loc else "", problem["type"]
    if kind == "extra_forbidden":
        message = f"not supported: {UNSUPPORTED.get(str(name), 'unknown key')}."
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


def _settings(
    method: MergeMethod,
    given: Mapping[str, Any],
    where: str,
    path: str,
    per_model: bool,
    warnings: list[str],
) -> dict[str, Setting]:
    """The settings under one `parameters:` mapping, each scalar checked against the method's declaration;
    what mergekit would ignore is left out with a warning."""
    known = known_parameters()
    values: dict[str, Setting] = {}
    for name, value in given.items():
        key = f"{where}.{name}"
        declared = method.parameter(name)
        spec = declared or known.get(name)
        if spec is None:
            here = [p.name for p in method.parameters if p.scope == "model" or not per_model]
            close = difflib.get_close_matches(str(name), [*here, *known], n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            warnings.append(
                f"key '{key}': unknown parameter, ignored (as mergekit does).{hint} "
                f"'{method.name}' reads: {', '.join(here) or 'nothing'}."
            )
            continue
        if value is None:
            continue  # explicitly unset: the default applies, as when the key is absent
        try:
            setting = parse_setting(spec, value)
        except ValueError as error:
            raise _fail(path, key, str(error)) from error
        if declared is None:
            if all(v == spec.neutral for v in scalars(setting)):
                continue  # the value that changes nothing is harmless
            warnings.append(
                f"key '{key}': {name} {value!r} has no effect with '{method.name}' and is ignored (as mergekit "
                f"does); methods that read it: {_users(name)}."
            )
            continue
        if per_model and spec.scope == "global":
            warnings.append(
                f"key '{key}': '{name}' is set once per merge, under the top-level `parameters:`; ignored "
                "here (as mergekit does)."
            )
            continue
        values[name] = setting
    return values


def _constant(settings: Mapping[str, Setting]) -> dict[str, Any]:
    return {k: (v if is_constant(v) else to_yaml(v)) for k, v in settings.items()}


def _resolve(schema: MergeYAML, data: Mapping[str, Any], path: str, warnings: list[str]) -> MergeConfig:
    method = get_method(schema.merge_method)
    if (schema.models is None) == (schema.slices is None):
        both = schema.models is not None
        raise _fail(
            path,
            "models",
            "give either `models:` or `slices:`, not both."
            if both
            else "missing; give a non-empty list of `- model: <path>` entries (or `slices:`).",
        )
    if schema.tokenizer_source is not None and schema.tokenizer is not None:
        raise _fail(
            path, "tokenizer", "give either `tokenizer_source` or `tokenizer:`, not both (as in mergekit)."
        )
    top = _settings(method, schema.parameters or {}, "parameters", path, False, warnings)
    model_keys = {p.name for p in method.parameters if p.scope == "model"}
    global_values = {
        **method.defaults("global"),
        **_constant({k: v for k, v in top.items() if k not in model_keys}),
    }
    model_defaults = {
        **method.defaults("model"),
        **_constant({k: v for k, v in top.items() if k in model_keys}),
    }
    models: list[ModelEntry] = []
    for i, entry in enumerate(schema.models or ()):
        own = _settings(method, entry.parameters or {}, f"models[{i}].parameters", path, True, warnings)
        models.append(ModelEntry(entry.model, {**model_defaults, **_constant(own)}, own))
    sources = [m.source for m in models]
    for i, source in enumerate(sources):
        if sources.index(source) != i:
            raise _fail(
                path,
                f"models[{i}].model",
                f"'{source}' is listed twice (first as models[{sources.index(source)}]).",
            )
    slices = None
    if schema.slices is not None:
        slices = [_slice(method, piece, i, path, warnings) for i, piece in enumerate(schema.slices)]
    if schema.base_model is None and method.needs_base and not (slices and all(s.base_model for s in slices)):
        raise _fail(
            path,
            "base_model",
            f"missing; '{schema.merge_method}' works on task vectors (model - base), so it needs a base model.",
        )
    distinct = {schema.base_model, *(m.source for m in models)} - {None}
    for piece in slices or ():
        distinct |= {piece.base_model, *(s.source for s in piece.sources)} - {None}
    if len(distinct) == 1:  # the pool reads the layout from one model and merges the others in: none left
        (only,) = distinct
        raise _fail(
            path,
            "base_model" if schema.base_model is not None else "models",
            f"the merge names one model only ('{only}'); add the model it was fine-tuned from as `base_model` "
            f"(a passthrough then copies '{only}' alone), or list more models.",
        )
    seeds = {k: v for k, v in (("random_seed", schema.random_seed), ("seed", schema.seed)) if v is not None}
    if len(set(seeds.values())) > 1:
        raise _fail(
            path, "seed", f"random_seed={seeds['random_seed']} and seed={seeds['seed']} disagree; give one."
        )
    referenced = [schema.base_model, *(m.source for m in models)]
    referenced += [s.source for piece in slices or () for s in piece.sources]
    source = schema.tokenizer.source if schema.tokenizer is not None else schema.tokenizer_source
    if source is not None and source not in ("base", "union", *referenced):
        key = "tokenizer.source" if schema.tokenizer is not None else "tokenizer_source"
        raise _fail(
            path, key, f"'{source}' is none of base, union or a model of this merge; name one of them."
        )
    if schema.chat_template is not None:
        try:
            check_chat_template(schema.chat_template)
        except ExpertMergeError as error:
            raise _fail(path, "chat_template", str(error)) from None
    tokenizer = None
    if schema.tokenizer is not None:
        tokenizer = TokenizerSpec(
            schema.tokenizer.source,
            {t: c.model_dump(exclude_none=True) for t, c in (schema.tokenizer.tokens or {}).items()},
            schema.tokenizer.pad_to_multiple_of,
        )
    elif schema.tokenizer_source is not None:
        tokenizer = TokenizerSpec(schema.tokenizer_source)
    seed = next(iter(seeds.values()), 0)
    if slices is None:
        # mergekit leaves a base-aware method's base out of the inputs it merges as experts.
        dry = [m for m in models if not (method.uses_base and m.source == schema.base_model)]
        with_base = method.uses_base and schema.base_model is not None
        for t in (
            0.0,
            1.0,
        ):  # the ends of every gradient; filtered values are checked per tensor at merge time
            dry_run(
                method,
                [resolve_values(method, "model", [m.settings, top], "", t) for m in dry],
                resolve_values(method, "global", [top], "", t),
                f"{path}: key 'models'",
                with_base,
            )
    return MergeConfig(
        merge_method=method.name,
        models=models,
        parameters=global_values,
        base_model=schema.base_model,
        dtype=schema.out_dtype or schema.dtype,  # mergekit: out_dtype (the output's) overrides dtype
        input_dtype=schema.dtype,
        tokenizer_source=schema.tokenizer_source or "base",
        tokenizer=tokenizer,
        chat_template=schema.chat_template,
        slices=slices,
        settings=top,
        seed=seed,
        include=schema.include,
        exclude=schema.exclude,
        trust_remote_code=schema.trust_remote_code,
        output_dir=schema.output_dir,
        warnings=warnings,
        path=path,
        raw=dict(data),
    )


def _slice(method: MergeMethod, piece: Any, index: int, path: str, warnings: list[str]) -> SliceEntry:
    where = f"slices[{index}]"
    lengths = [s.layer_range[1] - s.layer_range[0] for s in piece.sources]
    if len(set(lengths)) > 1:
        raise _fail(
            path,
            f"{where}.sources",
            f"every source of a slice must span the same number of layers, got {lengths} (as in mergekit).",
        )
    sources = [
        SliceSource(
            s.model,
            s.layer_range,
            _settings(method, s.parameters or {}, f"{where}.sources[{j}].parameters", path, True, warnings),
        )
        for j, s in enumerate(piece.sources)
    ]
    names = [s.source for s in sources]
    most = getattr(method, "max_inputs", None)
    if most is not None and len(names) > most:
        raise _fail(
            path,
            f"{where}.sources",
            f"'{method.name}' takes at most {most} source(s) per slice, got {len(names)}; give one model per "
            "slice (a frankenmerge stacks slices), or use another merge method.",
        )
    if len(set(names)) != len(names):
        raise _fail(path, f"{where}.sources", f"a model is listed twice in one slice: {names}.")
    settings = _settings(method, piece.parameters or {}, f"{where}.parameters", path, False, warnings)
    return SliceEntry(sources, piece.base_model, settings)


def resolve_values(
    method: MergeMethod,
    scope: str,
    settings: Sequence[Mapping[str, Setting] | None],
    tensor_name: str,
    t: float,
) -> dict[str, Any]:
    """The method's `scope` parameters for one tensor, from the settings (most specific first)."""
    return {p.name: resolve(p, settings, tensor_name, t) for p in method.parameters if p.scope == scope}


def dry_run(
    method: MergeMethod,
    model_values: Sequence[Mapping[str, Any]],
    global_values: Mapping[str, Any],
    where: str,
    with_base: bool,
) -> None:
    """Anything else the method refuses (e.g. `average` normalizing weights that sum to 0) shows up on a
    one-element merge, before any model is opened. Distinct non-zero inputs, so that no method's degenerate
    case (zero or antipodal vectors) is hit."""
    try:
        method.merge(
            torch.zeros(1) if with_base else None,
            [torch.full((1,), float(i + 1)) for i in range(len(model_values))],
            model_values,
            global_values,
            tensor_generator(0, "dry-run"),
        )
    except ExpertMergeError as error:
        raise ExpertMergeError(f"{where}: {error}") from error


def parse_merge_config(data: Any, path: str = "<config>") -> MergeConfig:
    """Validate a config given as a mapping (already read from YAML); every error names `path` and the key."""
    if not isinstance(data, Mapping):
        raise ExpertMergeError(
            f"{path}: expected a mapping of keys at the top level, got {type(data).__name__}."
        )
    warnings: list[str] = []
    try:
        schema = MergeYAML.model_validate(_strip_unknown(data, warnings))
    except ValidationError as error:
        raise _schema_error(error, path) from None
    return _resolve(schema, data, path, warnings)


def load_merge_config(path: str | os.PathLike) -> MergeConfig:
    """Read and validate a merge YAML; relative model paths are taken as given (relative to the cwd)."""
    from expertmerge.config_file import read_config_file

    return parse_merge_config(read_config_file(path, "merge --config"), str(path))
