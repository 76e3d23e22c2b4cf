"""`ExpertPool`: a base model and N experts fine-tuned from it, read lazily tensor by tensor.

"What to merge" lives here (FusionBench's model pool): where each model comes from, whether the models are
compatible, and which tensors are merged. Nothing here holds a whole model: checkpoint files are opened with
safetensors' `safe_open` (or memory-mapped `torch.load(weights_only=True)` for `.bin`), the handles are kept,
and each call reads one tensor of one model.

Where each model's folder comes from (a local folder, `zoo://`, a hub id): `expertmerge.io.sources`.

Which tensors are merged (`merged_names`): every floating-point tensor whose name matches one of the `include`
regular expressions (default: all) and none of the `exclude` ones (default: none), matched with `re.search`.
Integer/bool buffers are never merged. Tensors that are not merged are taken from the base unchanged.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from expertmerge.errors import ExpertMergeError
from expertmerge.hashing import file_hash, model_content_hash, weights_hash
from expertmerge.io.layout import TensorLayout, meta_model
from expertmerge.io.model_config import vocab_size
from expertmerge.io.reader import (  # noqa: F401 - re-exported: callers name the file layout via the pool
    BIN_INDEX,
    BIN_SINGLE,
    SAFETENSORS_INDEX,
    SAFETENSORS_SINGLE,
    Checkpoint,
    _few,
    natural_key,
)
from expertmerge.io.tokenizer_ids import TOKENIZER_FILES, tokenizer_json_ids
from expertmerge.sources import model_dir

BASE = "base"  # the key of the base model in `content_hashes()`; no expert may take this name


class ExpertPool:
    """A base model and named experts fine-tuned from it.

    Args:
        base: the base model: local folder, `zoo://` reference or hub id.
        experts: `{name: source}`, or a list of sources named after their last path component (made unique
            by prefixing parent folders, then numbering).
        trust_remote_code: passed to `AutoConfig` for the config; never on unless given.
        include / exclude: regular expressions (`re.search`) choosing which tensors are merged;
            default: every floating-point tensor is merged (training-free merges), none is excluded.
        distinct: `validate` refuses an expert that is the base (same folder or same weights) and one model
            listed under two names. Off only where mergekit allows it (a MoE may route to the base's FFN).
    """

    # An expert that may be the base itself (Symphony's reference expert is its base by design).
    _base_expert: str | None = None

    def __init__(
        self,
        base: str,
        experts: Mapping[str, str] | Sequence[str],
        trust_remote_code: bool = False,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        distinct: bool = True,
    ) -> None:
        self.base_source = str(base)
        self.distinct = bool(distinct)
        self.expert_sources: dict[str, str] = _name_experts(experts)
        self.trust_remote_code = bool(trust_remote_code)
        self.include = _compile(include, "include")
        self.exclude = _compile(exclude, "exclude")
        self.notes: list[str] = []  # what validate() accepted but a user may want to know
        self._dirs: dict[str, Path] = {}
        self._checkpoints: dict[str, Checkpoint] = {}
        self._validated = False

    # ----------------------------------------------------------------------------------------- sources
    @property
    def expert_names(self) -> list[str]:
        return list(self.expert_sources)

    def label(self, model: str) -> str:
        """How errors name a model: its role, name and source."""
        if model == BASE:
            return f"base model ({self.base_source})"
        return f"expert '{model}' ({self.expert_sources[model]})"

    def _dir(self, model: str) -> Path:
        if model not in self._dirs:
            source = self.base_source if model == BASE else self.expert_sources[model]
            self._dirs[model] = model_dir(source, self.label(model))
        return self._dirs[model]

    @property
    def base_dir(self) -> Path:
        return self._dir(BASE)

    @property
    def expert_dirs(self) -> dict[str, Path]:
        return {name: self._dir(name) for name in self.expert_sources}

    def checkpoint(self, model: str) -> Checkpoint:
        """The lazily opened weights of `model` (`"base"` or an expert name)."""
        if model != BASE and model not in self.expert_sources:
            raise ExpertMergeError(f"Unknown expert '{model}'; experts are {self.expert_names}.")
        if model not in self._checkpoints:
            self._checkpoints[model] = Checkpoint(self._dir(model), self.label(model))
        return self._checkpoints[model]

    def raw_config(self, model: str) -> dict[str, Any]:
        path = self._dir(model) / "config.json"
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise ExpertMergeError(f"{self.label(model)}: cannot read '{path}': {error}") from error

    def load_config(self, model: str) -> Any:
        """`transformers` config of a model (class defaults filled in)."""
        from transformers import AutoConfig

        try:
            return AutoConfig.from_pretrained(str(self._dir(model)), trust_remote_code=self.trust_remote_code)
        except Exception as error:
            hint = "" if self.trust_remote_code else " (if it needs custom code, set trust_remote_code: true)"
            raise ExpertMergeError(f"{self.label(model)}: cannot load its config: {error}{hint}") from error

    @cached_property
    def config(self) -> Any:
        """The base's `transformers` config."""
        return self.load_config(BASE)

    # ----------------------------------------------------------------------------------------- tensors
    @property
    def tensor_names(self) -> list[str]:
        """All tensor names of the base checkpoint, in model order (layer numbers sorted numerically)."""
        return list(self.checkpoint(BASE).names)

    @cached_property
    def merged_names(self) -> list[str]:
        """Floating-point tensors matched by `include` (default all) and not by `exclude` (default none)."""
        base = self.checkpoint(BASE)
        return [
            name
            for name in base.names
            if base.dtype(name).is_floating_point
            and (self.include is None or any(p.search(name) for p in self.include))
            and not any(p.search(name) for p in self.exclude or ())
        ]

    def shape(self, name: str) -> tuple[int, ...]:
        """The shape of checkpoint tensor `name`, or of a module tensor built from several (`parameter_keys`)."""
        if name in self.checkpoint(BASE).names_set:
            return self.checkpoint(BASE).shape(name)
        return self.layout.shape(name)

    def stored_dtype(self, name: str) -> torch.dtype:
        """The dtype the base checkpoint stores `name` in."""
        return self.checkpoint(BASE).dtype(name)

    def base_tensor(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self._read(BASE, name, dtype)

    def expert_tensor(self, expert: str, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        if expert not in self.expert_sources:
            raise ExpertMergeError(f"Unknown expert '{expert}'; experts are {self.expert_names}.")
        return self._read(expert, name, dtype)

    def _read(self, model: str, name: str, dtype: torch.dtype | None) -> torch.Tensor:
        """A checkpoint tensor by its name, or a module tensor that transformers builds from several."""
        checkpoint = self.checkpoint(model)
        if name in checkpoint.names_set:
            return checkpoint.tensor(name, dtype)
        return self.layout.read(checkpoint.tensor, name, dtype, cache_id=id(checkpoint))

    def iter_task_vectors(self, name: str, dtype: torch.dtype = torch.bfloat16) -> Iterator[torch.Tensor]:
        """`theta_k - theta_base` expert by expert, subtracted in fp32 and then cast to `dtype`: only the base
        and one expert tensor are in memory at a time. Non-finite base or expert values raise, naming both."""
        base = self.base_tensor(name, torch.float32)
        for expert in self.expert_sources:
            yield (self.expert_tensor(expert, name, torch.float32) - base).to(dtype)

    def task_vectors(self, name: str, dtype: torch.dtype = torch.bfloat16) -> list[torch.Tensor]:
        """`theta_k - theta_base` for every expert, in expert order (see `iter_task_vectors`)."""
        return list(self.iter_task_vectors(name, dtype))

    @cached_property
    def layout(self) -> TensorLayout:
        """The base's module parameters <-> checkpoint tensors, as the installed transformers maps them at load
        (renamed keys, experts' per-expert tensors stacked into 3-D ones; `io/layout.py`). The experts share it:
        `validate` checks they have the base's tensor names and shapes."""
        base = self.checkpoint(BASE)
        stored = {name: base.shape(name) for name in base.names}
        return TensorLayout(meta_model(self.config, self.trust_remote_code), stored, self.label(BASE))

    def parameter_keys(self, model: torch.nn.Module) -> dict[str, str]:
        """What each of `model`'s parameters (`named_parameters()` names) is read as from the pool: the
        checkpoint tensor that holds it, or its own name where transformers builds it from several tensors
        (`base_tensor` / `expert_tensor` read both).

        A tied parameter is listed once under one of its names while the checkpoint may store it under another
        (e.g. `lm_head.weight` only). Buffers are not merged, so they are not looked up.
        """
        layout = self.layout
        aliases: dict[int, list[str]] = {}
        for name, parameter in model.named_parameters(remove_duplicate=False):
            aliases.setdefault(id(parameter), []).append(name)
        keys = {}
        for name, parameter in model.named_parameters():
            known = [alias for alias in aliases[id(parameter)] if alias in layout]
            if not known:
                raise ExpertMergeError(
                    f"{self.label(BASE)}: the model's parameter '{name}' is not in its checkpoint, neither "
                    f"under that name nor under any name the installed transformers converts from (tensor "
                    f"names look like '{self.tensor_names[0]}'); was it saved from another architecture?"
                )
            keys[name] = layout.key(known[0]) or known[0]
        return keys

    def iter_tensors(
        self, names: Iterable[str] | None = None, dtype: torch.dtype | None = None
    ) -> Iterator[tuple[str, torch.Tensor, list[torch.Tensor]]]:
        """Yield `(name, base tensor, [expert tensors])` one tensor name at a time (default: `merged_names`)."""
        for name in self.merged_names if names is None else names:
            yield (
                name,
                self.base_tensor(name, dtype),
                [self.expert_tensor(e, name, dtype) for e in self.expert_sources],
            )

    def load_model(self, model: str = BASE) -> torch.nn.Module:
        """The base (`"base"`) or an expert as a `transformers` model in fp32, eval mode."""
        from transformers import AutoModelForCausalLM

        folder = self.base_dir if model == BASE else self.expert_dirs[model]
        loaded = AutoModelForCausalLM.from_pretrained(
            str(folder), dtype=torch.float32, trust_remote_code=self.trust_remote_code
        )
        return loaded.eval()

    def content_hashes(self) -> dict[str, str]:
        """`{"base": hash, expert: hash, ...}` of weights and config (cached per file version, see `file_hash`)."""
        hashes = {BASE: model_content_hash(self.base_dir)}
        hashes.update({name: model_content_hash(folder) for name, folder in self.expert_dirs.items()})
        return hashes

    def close(self) -> None:
        for checkpoint in self._checkpoints.values():
            checkpoint.close()
        self._checkpoints.clear()

    # -------------------------------------------------------------------------------------- validation
    def validate(self) -> ExpertPool:
        """Check that the experts can be merged onto the base; raise one `ExpertMergeError` otherwise.

        Checks, in this order, naming the model (name and path) and the tensor at fault: folders and configs
        exist, no folder is listed twice (`distinct`), same `model_type`, same tied/untied embeddings, same
        vocabulary size, same tokenizer (where an expert ships one; a missing one is noted in `notes`), same
        tensor names, same shapes, and last no expert has the base's or another expert's weights (`distinct`).
        Tensor values are checked for NaN/Inf when they are read. Cheap: reads configs and checkpoint headers,
        and hashes the weight files once (remembered per file version; the teacher cache needs the hashes too).
        """
        if self._validated:
            return self
        models = [BASE, *self.expert_sources]
        for model in models:
            self._dir(model)
        if self.distinct:
            self._check_distinct(lambda model: self._dir(model).resolve(), "is the same folder as")
        raw = {model: self.raw_config(model) for model in models}
        base_type = raw[BASE].get("model_type")
        for model in self.expert_sources:
            if raw[model].get("model_type") != base_type:
                raise ExpertMergeError(
                    f"{self.label(model)} has model_type '{raw[model].get('model_type')}' but the "
                    f"{self.label(BASE)} has '{base_type}'; experts must be fine-tunes of the base architecture."
                )
        configs = {model: self.load_config(model) for model in models}
        self.__dict__["config"] = configs[BASE]
        base_tie, base_vocab = _tied(configs[BASE]), vocab_size(configs[BASE])
        for model in self.expert_sources:
            tie = _tied(configs[model])
            if tie != base_tie:
                raise ExpertMergeError(
                    f"{self.label(model)} has tie_word_embeddings={tie} but the {self.label(BASE)} has "
                    f"{base_tie}; tied and untied embeddings cannot be merged tensor by tensor."
                )
            vocab = vocab_size(configs[model])
            if vocab != base_vocab:
                raise ExpertMergeError(
                    f"{self.label(model)} has vocab_size={vocab} but the {self.label(BASE)} has {base_vocab}; "
                    "experts with a resized vocabulary cannot be merged."
                )
        for model in self.expert_sources:
            self._check_tokenizer(model)
        base = self.checkpoint(BASE)
        base_names = set(base.names)
        for model in self.expert_sources:
            checkpoint = self.checkpoint(model)
            names = set(checkpoint.names)
            missing, extra = base_names - names, names - base_names
            if missing:
                raise ExpertMergeError(
                    f"{self.label(model)} lacks {len(missing)} tensor(s) that the base has: {_few(missing)}."
                )
            if extra:
                raise ExpertMergeError(
                    f"{self.label(model)} has {len(extra)} tensor(s) that the base lacks: {_few(extra)}."
                )
            for name in base.names:
                if checkpoint.shape(name) != base.shape(name):
                    raise ExpertMergeError(
                        f"{self.label(model)}: tensor '{name}' has shape {list(checkpoint.shape(name))} but "
                        f"the base's is {list(base.shape(name))}."
                    )
        if not self.merged_names:
            raise ExpertMergeError(
                f"No tensor matches include={_patterns(self.include)} / exclude={_patterns(self.exclude)}; "
                f"tensor names look like '{base.names[0]}'."
            )
        if self.distinct:
            self._check_distinct(lambda model: weights_hash(self._dir(model)), "has the same weights as")
        self._validated = True
        return self

    def _check_distinct(self, identity: Any, relation: str) -> None:
        """No two models with the same `identity(model)`: an expert equal to the base has a zero task vector
        (it adds nothing, and a gain measured against the base divides by zero), and an expert listed twice
        counts twice."""
        seen: dict[Any, str] = {}
        for model in [BASE, *self.expert_sources]:
            key = identity(model)
            first = seen.setdefault(key, model)
            if first == model or (first == BASE and model == self._base_expert):
                continue
            if first == BASE and self._base_expert is not None:
                first = self._base_expert  # the base is one of the experts: a twin of it is listed twice
            if first == BASE:
                raise ExpertMergeError(
                    f"{self.label(model)} {relation} the {self.label(BASE)}: its task vector is zero, so it "
                    "adds nothing and its gain over the base cannot be measured; give the fine-tuned expert."
                )
            raise ExpertMergeError(
                f"{self.label(model)} {relation} {self.label(first)}: one model listed under two names "
                "would count twice; list each expert once."
            )

    def _check_tokenizer(self, model: str) -> None:
        base_dir, folder = self.base_dir, self._dir(model)
        base_files = [f for f in TOKENIZER_FILES if (base_dir / f).is_file()]
        model_files = [f for f in TOKENIZER_FILES if (folder / f).is_file()]
        if not model_files:
            self.notes.append(f"{self.label(model)} ships no tokenizer; the base's tokenizer is assumed.")
            return
        if not base_files:
            self.notes.append(f"The {self.label(BASE)} ships no tokenizer; tokenizers were not compared.")
            return
        for filename in sorted(set(base_files) & set(model_files)):
            if file_hash(base_dir / filename) == file_hash(folder / filename):
                continue
            if filename == "tokenizer.json" and tokenizer_json_ids(base_dir / filename) == tokenizer_json_ids(
                folder / filename
            ):
                continue  # same ids, only settings (padding, truncation, ...) differ
            raise ExpertMergeError(
                f"{self.label(model)} has a different tokenizer from the {self.label(BASE)} ('{filename}' "
                "differs); experts must share the base's vocabulary."
            )
        if not set(base_files) & set(model_files):
            self.notes.append(
                f"{self.label(model)} and the base ship different tokenizer files ({model_files} vs {base_files}); "
                "they were not compared."
            )


def _compile(patterns: Sequence[str] | None, key: str) -> list[re.Pattern] | None:
    if patterns is None:
        return None
    if isinstance(patterns, str):
        patterns = [patterns]
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except re.error as error:
            raise ExpertMergeError(
                f"{key}: '{pattern}' is not a valid regular expression ({error})."
            ) from error
    return compiled


def _patterns(compiled: list[re.Pattern] | None) -> list[str] | None:
    return None if compiled is None else [p.pattern for p in compiled]


def _tied(config: Any) -> bool:
    for candidate in (config, config.get_text_config()):
        value = getattr(candidate, "tie_word_embeddings", None)
        if value is not None:
            return bool(value)
    return False


def _default_name(source: str) -> list[str]:
    """Path components of a source, last first (`zoo://tiny/experts/arith` -> [arith, experts, tiny])."""
    text = source.split("://", 1)[-1].rstrip("/\\")
    parts = [p for p in re.split(r"[/\\]", text) if p not in ("", ".", "..", "~")]
    return list(reversed(parts)) or [source]


def _name_experts(experts: Mapping[str, str] | Sequence[str]) -> dict[str, str]:
    if isinstance(experts, str):
        raise ExpertMergeError(
            "experts must be a list of sources or a {name: source} mapping, not one string."
        )
    if isinstance(experts, Mapping):
        named = {str(k): str(v) for k, v in experts.items()}
        if BASE in named:
            raise ExpertMergeError(f"An expert may not be named '{BASE}' (reserved for the base model).")
    else:
        sources = [str(s) for s in experts]
        duplicates = sorted({s for s in sources if sources.count(s) > 1})
        if duplicates:
            raise ExpertMergeError(f"Expert source(s) given more than once: {duplicates}.")
        parts = [_default_name(s) for s in sources]
        depth = [1] * len(sources)

        def name_of(i: int) -> str:
            return "-".join(reversed(parts[i][: depth[i]]))

        # Prefix parent folders until names differ (runA/ckpt, runB/ckpt -> runA-ckpt, runB-ckpt).
        while True:
            names = [name_of(i) for i in range(len(sources))]
            clashing = [i for i, n in enumerate(names) if names.count(n) > 1 or n == BASE]
            growable = [i for i in clashing if depth[i] < len(parts[i])]
            if not growable:
                break
            for i in growable:
                depth[i] += 1
        named = {}
        for source, name in zip(sources, names, strict=True):
            unique, number = name, 2
            while unique in named or unique == BASE:
                unique, number = f"{name}-{number}", number + 1
            named[unique] = source
    if len(named) < 1:
        raise ExpertMergeError("At least one expert is needed.")
    return named
