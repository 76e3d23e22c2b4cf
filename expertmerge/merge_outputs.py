"""What a training-free merge writes beside its weights: `config.json` (layers and vocabulary as merged), the
tokenizer (the base's files, or the one `tokenizer:` / `chat_template:` built), the re-runnable
`merge_config.yaml` and the merge card."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from expertmerge.health import HealthCheck
from expertmerge.io.card import write_merge_card
from expertmerge.io.reader import dtype_name
from expertmerge.io.support import copy_support_files, write_config
from expertmerge.io.tokenizer import Vocabulary, chat_template_text, load_tokenizer, save_tokenizer
from expertmerge.merge_config.resolved import MergeConfig
from expertmerge.merge_config.slices import OutputTensor, layer_config, output_layers
from expertmerge.merge_inputs import MergeInputs


def write_output_config(
    config: MergeConfig,
    inputs: MergeInputs,
    plan: list[OutputTensor],
    target: Path,
    out_dtype: torch.dtype,
    vocabulary: Vocabulary | None,
) -> None:
    write_config(inputs.folder(inputs.structure), target, out_dtype)
    if config.slices is None and vocabulary is None:
        return
    data = json.loads((target / "config.json").read_text())
    if config.slices is not None:
        layers = output_layers(plan)
        sources = {m: inputs.raw_config(m) for m, _ in layers}
        data = layer_config(data, layers, sources, inputs.config(inputs.structure))
    if vocabulary is not None:
        holder = (
            data["text_config"]
            if "vocab_size" not in data and isinstance(data.get("text_config"), dict)
            else data
        )
        holder["vocab_size"] = vocabulary.size
    (target / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_output_tokenizer(
    config: MergeConfig, inputs: MergeInputs, target: Path, vocabulary: Vocabulary | None
) -> None:
    """The base's files, or (with `tokenizer:` / `chat_template:`) the built tokenizer saved by transformers."""
    copy_support_files(inputs.folder(inputs.structure), target, config.trust_remote_code)
    if vocabulary is None and config.chat_template is None:
        return
    folders = {m: inputs.folder(m) for m in config.referenced_models}
    template = None
    if config.chat_template is not None:
        template = chat_template_text(config.chat_template, folders, config.trust_remote_code)
    tokenizer = vocabulary.tokenizer if vocabulary is not None else None
    if tokenizer is None:
        tokenizer = load_tokenizer(
            inputs.folder(config.base_model or config.referenced_models[0]), config.trust_remote_code
        )
    save_tokenizer(tokenizer, target, template)


def write_merge_record(
    config: MergeConfig,
    inputs: MergeInputs,
    plan: list[OutputTensor],
    target: Path,
    out_dtype: torch.dtype,
    health: HealthCheck,
    merged_count: int,
    experts: set[str],
) -> None:
    """`merge_config.yaml` (the resolved config, re-runnable) and the merge card naming every input's hash."""
    pool = inputs.pool
    sources = config.referenced_models
    resolved_yaml = config.to_mergekit_yaml()
    (target / "merge_config.yaml").write_text(resolved_yaml)
    hashes = pool.content_hashes()
    by_source = {source: name for name, source in pool.expert_sources.items()}
    by_source.setdefault(inputs.structure, Path(inputs.structure).name or inputs.structure)
    hash_of = {source: hashes[key] for source, key in inputs.keys.items()}
    experts_listed = [m for m in sources if m in experts]
    write_merge_card(
        target,
        title=f"{config.merge_method} merge of {len(experts_listed)} model(s)",
        method=config.merge_method,
        base=None if config.base_model is None else (config.base_model, hash_of[config.base_model]),
        experts={by_source[m]: (m, hash_of[m]) for m in experts_listed},
        parameters={
            **config.parameters,
            "models": {by_source[m.source]: {"source": m.source, **m.parameters} for m in config.models},
            **({"slices": len(config.slices), "layers": len(output_layers(plan))} if config.slices else {}),
            "dtype": dtype_name(out_dtype),
            "random_seed": config.seed,
            "include": config.include,
            "exclude": config.exclude,
            "tensors_merged": merged_count,
            "tensors_copied_from_base": len(plan) - merged_count,
        },
        sections={
            "Merge config": f"Re-run with `python -m expertmerge merge --config merge_config.yaml --out DIR`.\n\n"
            f"```yaml\n{resolved_yaml}```",
            "Health check": health.card_section(),
            **({"Notes": "\n".join(f"- {note}" for note in pool.notes)} if pool.notes else {}),
        },
    )
