"""Reading a merge YAML into a `MergeConfig`: the file's structure (`schema`), then every `parameters:` value
against the chosen method's declared `Parameter`s, and the cross-key rules, before any model is opened.

Errors name the file, the key path (`models[1].parameters.density`), what was given and what is allowed.
A key mergekit accepts and ignores (an unknown key, a parameter the method does not read) is a warning in
`MergeConfig.warnings`, so a config mergekit runs runs here.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from pydantic import ValidationError

from expertmerge.errors import ExpertMergeError
from expertmerge.io.tokenizer import check_chat_template
from expertmerge.merge_config.resolved import MergeConfig, ModelEntry, SliceEntry, SliceSource, TokenizerSpec
from expertmerge.merge_config.schema import (
    _EXPECTED,
    _MISSING,
    _SCHEMAS,
    UNSUPPORTED,
    MergeYAML,
    TokenizerYAML,
    _Schema,
)
from expertmerge.methods import METHODS, MergeMethod, get_method, known_parameters, tensor_generator
from expertmerge.methods.settings import Setting, is_constant, parse_setting, resolve_values, scalars, to_yaml

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
    """The typed file resolved against its method: each check in turn, the first failing one raised."""
    method = get_method(schema.merge_method)
    _check_models_or_slices(schema, path)
    top = _settings(method, schema.parameters or {}, "parameters", path, False, warnings)
    global_values, model_defaults = _scoped_defaults(method, top)
    models = _models(method, schema, model_defaults, path, warnings)
    slices = None
    if schema.slices is not None:
        slices = [_slice(method, piece, i, path, warnings) for i, piece in enumerate(schema.slices)]
    _check_model_count(method, schema, models, slices, path)
    seed = _seed(schema, path)
    tokenizer = _tokenizer(schema, models, slices, path)
    if slices is None:
        _dry_run_models(method, schema, models, top, path)
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


def _check_models_or_slices(schema: MergeYAML, path: str) -> None:
    """Exactly one of `models:` / `slices:`, and at most one of `tokenizer_source` / `tokenizer:`."""
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


def _scoped_defaults(
    method: MergeMethod, top: Mapping[str, Setting]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The once-per-merge values and the per-model defaults: the method's defaults under the top level's."""
    model_keys = {p.name for p in method.parameters if p.scope == "model"}
    global_values = {
        **method.defaults("global"),
        **_constant({k: v for k, v in top.items() if k not in model_keys}),
    }
    model_defaults = {
        **method.defaults("model"),
        **_constant({k: v for k, v in top.items() if k in model_keys}),
    }
    return global_values, model_defaults


def _models(
    method: MergeMethod,
    schema: MergeYAML,
    model_defaults: Mapping[str, Any],
    path: str,
    warnings: list[str],
) -> list[ModelEntry]:
    """The `models:` entries with their parameters resolved; a model listed twice is an error."""
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
    return models


def _check_model_count(
    method: MergeMethod,
    schema: MergeYAML,
    models: Sequence[ModelEntry],
    slices: Sequence[SliceEntry] | None,
    path: str,
) -> None:
    """A base where the method needs one, and at least two distinct models in all."""
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


def _seed(schema: MergeYAML, path: str) -> int:
    """`random_seed` (mergekit's) or `seed`; both given must agree."""
    seeds = {k: v for k, v in (("random_seed", schema.random_seed), ("seed", schema.seed)) if v is not None}
    if len(set(seeds.values())) > 1:
        raise _fail(
            path, "seed", f"random_seed={seeds['random_seed']} and seed={seeds['seed']} disagree; give one."
        )
    return next(iter(seeds.values()), 0)


def _tokenizer(
    schema: MergeYAML, models: Sequence[ModelEntry], slices: Sequence[SliceEntry] | None, path: str
) -> TokenizerSpec | None:
    """The tokenizer rules (None: the base's files are copied); its source must be base, union or a model of
    the merge, and a chat template must be one we know or a Jinja template."""
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
    if schema.tokenizer is not None:
        return TokenizerSpec(
            schema.tokenizer.source,
            {t: c.model_dump(exclude_none=True) for t, c in (schema.tokenizer.tokens or {}).items()},
            schema.tokenizer.pad_to_multiple_of,
        )
    if schema.tokenizer_source is not None:
        return TokenizerSpec(schema.tokenizer_source)
    return None


def _dry_run_models(
    method: MergeMethod, schema: MergeYAML, models: Sequence[ModelEntry], top: Any, path: str
) -> None:
    """`dry_run` at both ends of every gradient (filtered values are checked per tensor at merge time);
    `top`: the file's `parameters`, resolved."""
    # mergekit leaves a base-aware method's base out of the inputs it merges as experts.
    dry = [m for m in models if not (method.uses_base and m.source == schema.base_model)]
    with_base = method.uses_base and schema.base_model is not None
    for t in (0.0, 1.0):
        dry_run(
            method,
            [resolve_values(method, "model", [m.settings, top], "", t) for m in dry],
            resolve_values(method, "global", [top], "", t),
            f"{path}: key 'models'",
            with_base,
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
