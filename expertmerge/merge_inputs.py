"""The models a training-free merge reads: one `ExpertPool` with the structure model as its base and every other
referenced model as an expert, opened and checked by mergekit's rules before any tensor is read."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from expertmerge.errors import ExpertMergeError
from expertmerge.io.model_config import layer_count
from expertmerge.io.model_config import vocab_size as config_vocab_size
from expertmerge.merge_config.resolved import MergeConfig
from expertmerge.pool import BASE, ExpertPool


@dataclass
class MergeInputs:
    """The models a merge reads (one pool: the structure model as its base, every other model an expert)."""

    pool: ExpertPool
    structure: str
    keys: dict[str, str]  # source -> pool key
    _configs: dict[str, Any] = field(default_factory=dict, repr=False)

    def checkpoint(self, model: str) -> Any:
        return self.pool.checkpoint(self.keys[model])

    def folder(self, model: str) -> Path:
        return self.pool.base_dir if self.keys[model] == BASE else self.pool.expert_dirs[self.keys[model]]

    def raw_config(self, model: str) -> dict[str, Any]:
        return self.pool.raw_config(self.keys[model])

    def config(self, model: str) -> Any:
        """The model's `transformers` config, loaded once: sizes are read from it, under whatever key its family
        stores them (`n_layer` in GPT-2's config.json is its `num_hidden_layers`)."""
        key = self.keys[model]
        if key == BASE:
            return self.pool.config  # loaded once by the pool's own checks
        if key not in self._configs:
            self._configs[key] = self.pool.load_config(key)
        return self._configs[key]

    def num_layers(self, model: str) -> int:
        return layer_count(self.config(model), self.pool.label(self.keys[model]))

    def vocab_size(self, model: str) -> int | None:
        return config_vocab_size(self.config(model))


def open_merge_inputs(config: MergeConfig) -> MergeInputs:
    """mergekit's rules: the base gives structure, config and tokenizer (without one, the first model)."""
    referenced = config.referenced_models
    structure = referenced[0]
    others = [m for m in referenced if m != structure]
    pool = ExpertPool(
        structure,
        others,
        trust_remote_code=config.trust_remote_code,
        include=config.include,
        exclude=config.exclude,
        distinct=False,  # mergekit's meaning: a merge may list the base among its models
    )
    keys = {structure: BASE, **{source: name for name, source in pool.expert_sources.items()}}
    inputs = MergeInputs(pool, structure, keys)
    if config.slices is None and config.tokenizer is None and others:
        pool.validate()  # same architecture, vocabulary, tokenizer, names and shapes
    else:
        model_type = inputs.raw_config(structure).get("model_type")
        for model in others:
            if inputs.raw_config(model).get("model_type") != model_type:
                raise ExpertMergeError(
                    f"{pool.label(inputs.keys[model])} has model_type "
                    f"'{inputs.raw_config(model).get('model_type')}' but '{structure}' has '{model_type}'; "
                    "every model must share one architecture."
                )
    return inputs
